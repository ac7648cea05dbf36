"""Git operations on one branch of a remote repository, without blocking the event loop.

Two ways in:

* `cloned` (for committing files to a branch) clones the branch tip bare, with depth 1 and
  no work tree. Files are read from its objects; a commit of changed files is built in
  process (with dulwich), written into the clone's object store and sent with `git push`.
  One git process when nothing changes, two when something is pushed. Only SHA-1
  repositories are handled (a SHA-256 one is refused, not retryable), and content is
  committed as given: no .gitattributes filter (eol, lfs) runs on it as `git add` would.
  With `read` (the paths whose content will be read) the clone is partial
  (`--filter=blob:none`: commits and trees only) and just those blobs are fetched, in one
  more git process, so the cost does not grow with the repository's content. The remote
  must allow it as GitHub does (`uploadpack.allowFilter`, `uploadpack.allowAnySHA1InWant`);
  one that does not filter sends everything, as a plain clone would. A blob this process
  has already read or committed is not fetched again (`_BlobCache`): a redeploy whose
  fly.toml is the one the last deploy committed needs no second git process.
* `cloned_commit` (for tools that need files on disk) checks one commit out into a work
  tree.

Every command runs as `git` directly (never through a shell) with user-supplied refs and
paths after `--` or in `--opt=value` form, without terminal prompts, in the C locale so
errors can be classified, and is killed when the calling task is cancelled.

Credentials for a private remote (`GitAuth`) reach git through its environment only,
never its argv or the remote URL: a token as an `http.<origin>/.extraHeader` set with
`GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n` (so only that origin is sent
it), an SSH deploy key as a file of mode 0600 named by `GIT_SSH_COMMAND`, written for one
git command and removed when it ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shlex
import shutil
import signal
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, cast
from urllib.parse import urlsplit

from dulwich.errors import (
    ChecksumMismatch,
    FileFormatException,
    NotGitRepository,
    WrongObjectException,
)
from dulwich.objects import Blob, Commit, ObjectID, ShaFile, Tree
from dulwich.refs import HEADREF, Ref
from dulwich.repo import Repo

from core.processes import StopPolicy, start_in_group, stop_group

DEFAULT_TIMEOUT: Final = 300.0
PUSH_ATTEMPTS: Final = 3
_STDERR_LIMIT: Final = 1500
# SIGTERM first: git removes the lock files it holds. Killed outright, a push to a
# repository on this machine (the remote's receive-pack runs in git's process group) left
# the branch's lock behind, and every later push to it failed until someone deleted it.
_STOP: Final = StopPolicy(signal.SIGTERM, grace=2.0)


ACCESS_DENIED: Final = "access denied"


class GitError(Exception):
    """A git operation failed. `retryable` tells whether trying again later may succeed;
    `reason` names a known permanent cause (`ACCESS_DENIED`, "branch not found", ...)."""

    def __init__(self, message: str, *, retryable: bool, reason: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.reason = reason


class GitAuth:
    """Credentials for the remotes of one host, given to git through its environment only.

    `token`: an HTTPS token (a GitHub token, say) sent as HTTP basic auth with `username`
    in an `Authorization` header, to the repository URL's origin only. `ssh_key`: a
    private key for SSH remotes (a deploy key), with an optional known_hosts file. The
    values never show in a repr and cannot be pickled.
    """

    __slots__ = ("_header", "_known_hosts", "_ssh_command", "_ssh_key", "_token")

    def __init__(
        self,
        *,
        token: str | None = None,
        username: str = "x-access-token",
        ssh_key: str | None = None,
        known_hosts: str | None = None,
        ssh_command: str = "ssh",
    ) -> None:
        if (token is None) == (ssh_key is None):
            raise ValueError("GitAuth takes a token or an SSH key")
        if token is not None and any(ord(c) < 32 or ord(c) == 127 for c in token + username):
            raise ValueError("a git token must not contain control characters")
        self._token = token
        self._header = (
            None
            if token is None
            else "Basic " + base64.b64encode(f"{username}:{token}".encode()).decode("ascii")
        )
        key = None if ssh_key is None else ssh_key.strip().replace("\r\n", "\n") + "\n"
        self._ssh_key = key
        self._known_hosts = known_hosts
        self._ssh_command = ssh_command

    def secret_forms(self) -> list[str]:
        """What must never be shown: the token, the header value and its base64 body, or
        the key's lines."""
        if self._token is not None and self._header is not None:
            return [self._header, self._header.removeprefix("Basic "), self._token]
        assert self._ssh_key is not None
        lines = [ln for ln in self._ssh_key.splitlines() if ln and not ln.startswith("-----")]
        return lines

    @contextlib.contextmanager
    def environment(self, repo_url: str) -> Iterator[dict[str, str]]:
        """The variables that give git these credentials for `repo_url`, valid inside the
        block (an SSH key file exists only while it runs)."""
        if self._header is not None:
            origin = _origin(repo_url)
            if origin is None:
                yield {}
                return
            yield _config_env([(f"http.{origin}.extraHeader", f"Authorization: {self._header}")])
            return
        assert self._ssh_key is not None
        holder = Path(tempfile.mkdtemp(prefix="turbodeploy-key-"))  # mode 0700
        try:
            key_file = holder / "id"
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self._ssh_key)
            command = [
                *shlex.split(self._ssh_command),
                "-i", str(key_file),
                "-o", "IdentitiesOnly=yes",
                "-o", "IdentityAgent=none",
                "-o", "BatchMode=yes",
            ]  # fmt: skip
            if self._known_hosts:
                command += ["-o", f"UserKnownHostsFile={self._known_hosts}"]
            yield {"GIT_SSH_COMMAND": shlex.join(command), "GIT_SSH_VARIANT": "ssh"}
        finally:
            shutil.rmtree(holder, ignore_errors=True)

    def __repr__(self) -> str:
        kind = "token" if self._header is not None else "ssh_key"
        return f"GitAuth({kind}=<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("git credentials cannot be pickled")


def _origin(repo_url: str) -> str | None:
    """`https://host[:port]/` of an HTTP(S) URL, the scope of git's `http.<url>.*`."""
    parts = urlsplit(repo_url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/"


def _config_env(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """`git -c` settings as environment variables, after any the worker already has."""
    try:
        start = int(os.environ.get("GIT_CONFIG_COUNT", "0"))
    except ValueError:
        start = 0
    env = {"GIT_CONFIG_COUNT": str(start + len(pairs))}
    for i, (key, value) in enumerate(pairs, start):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


@dataclass(frozen=True)
class GitIdentity:
    name: str
    email: str


@dataclass(frozen=True)
class Checkout:
    """A working tree of one commit of `repo_url` (nothing can be pushed from it)."""

    path: Path
    repo_url: str
    base_sha: str  # the commit that was checked out


@dataclass(frozen=True)
class PushOutcome:
    sha: str  # the branch tip after the push
    pushed: bool  # False when the remote already had an identical change
    rebased: bool  # True when the branch had moved and our commits were replayed on it


# Checked in this order: a hang-up after "Repository not found" is still not found.
_PERMANENT: Final = (
    (re.compile(r"Remote branch .* not found|couldn't find remote ref", re.I), "branch not found"),
    (
        re.compile(
            r"repository .* (does not exist|not found)|Repository not found|"
            r"does not appear to be a git repository",
            re.I,
        ),
        "repository not found",
    ),
    (
        re.compile(
            r"Authentication failed|could not read (Username|Password)|Permission denied|"
            r"Host key verification failed|returned error: 40[13]|access denied",
            re.I,
        ),
        ACCESS_DENIED,
    ),
    (
        re.compile(r"hook declined|protected branch|\[remote rejected\](?!.*failed to)", re.I),
        "the remote refused the push",
    ),
)
_URL_CREDENTIALS_RE: Final = re.compile(r"(?<=://)[^/@\s]+@")


def _redact(text: str) -> str:
    return _URL_CREDENTIALS_RE.sub("***@", text)


def _trim(stderr: str, auth: GitAuth | None = None) -> str:
    text = _redact(stderr.strip())
    for form in auth.secret_forms() if auth is not None else ():
        text = text.replace(form, "***")
    if len(text) > _STDERR_LIMIT:
        text = "…" + text[-_STDERR_LIMIT:]
    return text


def _classify(action: str, stderr: str, auth: GitAuth | None = None) -> GitError:
    detail = _trim(stderr, auth) or "(no output)"
    for pattern, reason in _PERMANENT:
        if pattern.search(stderr):
            return GitError(f"{action} failed, {reason}: {detail}", retryable=False, reason=reason)
    return GitError(f"{action} failed: {detail}", retryable=True)


def _git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="",
        SSH_ASKPASS="",
        LC_ALL="C",
        LANGUAGE="C",
        GIT_CONFIG_NOSYSTEM="1",
        # git's traces (GIT_TRACE_CURL, ...) keep Authorization headers out.
        GIT_TRACE_REDACT="1",
    )
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    env.update(extra or {})
    return env


# Repository hooks and signing would run code or need keys the worker does not have.
_SAFE_CONFIG: Final = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "commit.gpgSign=false",
    "-c",
    "tag.gpgSign=false",
    "-c",
    "core.autocrlf=false",
)


@dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: str
    stderr: str


async def _run(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    limit_seconds: float = DEFAULT_TIMEOUT,
    action: str,
    remote: tuple[str, GitAuth | None] | None = None,
) -> _Result:
    """Run git; `remote` (the URL and its credentials) for a command that talks to it."""
    with contextlib.ExitStack() as stack:
        extra: dict[str, str] = {}
        if remote is not None and remote[1] is not None:
            extra = stack.enter_context(remote[1].environment(remote[0]))
        try:
            proc = await start_in_group(
                ["git", *_SAFE_CONFIG, *args], stop=_STOP, cwd=cwd, env=_git_env(extra)
            )
        except FileNotFoundError:
            raise GitError("git is not installed on this worker", retryable=False) from None
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), limit_seconds)
        except TimeoutError:
            await stop_group(proc, _STOP)
            raise GitError(
                f"{action} timed out after {limit_seconds:.0f}s", retryable=True
            ) from None
        except BaseException:
            await stop_group(proc, _STOP)
            raise
    assert proc.returncode is not None
    return _Result(
        proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )


async def _git(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    limit_seconds: float = DEFAULT_TIMEOUT,
    action: str,
    remote: tuple[str, GitAuth | None] | None = None,
) -> str:
    result = await _run(args, cwd=cwd, limit_seconds=limit_seconds, action=action, remote=remote)
    if result.returncode != 0:
        raise _classify(action, result.stderr or result.stdout, remote and remote[1])
    return result.stdout


class _BlobCache:
    """The content of small blobs this process has read or committed, by id, least
    recently used first out. A blob's id is the hash of its content, so an entry is never
    stale: it is only ever stored under the id computed here from the content itself."""

    def __init__(self, max_bytes: int, max_blob: int) -> None:
        self._max_bytes = max_bytes
        self._max_blob = max_blob
        self._entries: OrderedDict[ObjectID, bytes] = OrderedDict()
        self._bytes = 0

    def __contains__(self, sha: object) -> bool:
        return sha in self._entries

    def get(self, sha: ObjectID) -> bytes | None:
        data = self._entries.get(sha)
        if data is not None:
            self._entries.move_to_end(sha)
        return data

    def put(self, blob: Blob) -> None:
        """Keep a blob made here from its content (`Blob.from_string`), when small enough."""
        sha, data = blob.id, blob.as_raw_string()
        if len(data) <= self._max_blob and sha not in self._entries:
            self._entries[sha] = data
            self._bytes += len(data)
            while self._bytes > self._max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


# fly.toml files are a few KiB: thousands of projects' fit in a few MiB.
_blobs: Final = _BlobCache(max_bytes=8 << 20, max_blob=64 << 10)


# --------------------------------------------------------------------------- public API


class BranchClone:
    """The tip of `branch` of `repo_url`, cloned bare (no work tree) with depth 1 to `path`.

    Files are read from the tip's objects. `write_file` keeps new content in memory,
    `commit_if_changed` makes it one commit in the clone's object store and `push` sends
    that commit to the branch. The objects needed are few (the root tree, a file or two),
    so they are read and written in process, on the event loop.
    """

    def __init__(self, path: Path, repo_url: str, branch: str, auth: GitAuth | None = None) -> None:
        self.path = path
        self.repo_url = repo_url
        self.branch = branch
        self._auth = auth
        self._repo = _open(path)
        self._trees: dict[ObjectID, Tree] = {}
        self._staged: dict[str, bytes] = {}
        self._pending: _Pending | None = None
        try:
            self.base_sha = self._ref(HEADREF).decode("ascii")  # the commit that was cloned
            self._base_tree = self._commit(ObjectID(self.base_sha.encode())).tree
        except BaseException:
            self._repo.close()
            raise

    def _close(self) -> None:
        self._repo.close()

    def _ref(self, name: Ref) -> ObjectID:
        with _reading(self.path):
            return self._repo.refs[name]

    def _object(self, sha: ObjectID) -> ShaFile:
        with _reading(self.path):
            return self._repo.object_store[sha]

    def _commit(self, sha: ObjectID) -> Commit:
        obj = self._object(sha)
        if not isinstance(obj, Commit):
            raise GitError(f"{sha.decode()} is not a commit", retryable=False)
        return obj

    def _tree(self, sha: ObjectID) -> Tree:
        tree = self._trees.get(sha)
        if tree is None:
            obj = self._object(sha)
            if not isinstance(obj, Tree):
                raise GitError(f"{sha.decode()} is not a tree", retryable=False)
            tree = self._trees[sha] = obj
        return tree

    def _lookup(self, rel: str, root: ObjectID | None = None) -> _Entry | None:
        """The entry at `rel` in the tree `root` (the cloned commit's by default)."""
        mode, sha = stat.S_IFDIR, root or self._base_tree
        for part in rel.split("/"):
            if not stat.S_ISDIR(mode):
                return None
            found = _entry(self._tree(sha), part.encode())
            if found is None:
                return None
            mode, sha = found
        return mode, sha

    def _blob(self, sha: ObjectID) -> bytes:
        known = _blobs.get(sha)
        if known is not None:
            return known
        obj = self._object(sha)
        if not isinstance(obj, Blob):
            raise GitError(f"{sha.decode()} is not a file's content", retryable=False)
        data = obj.as_raw_string()
        _blobs.put(Blob.from_string(data))  # its id from the content, not the store's
        return data

    def _build(
        self,
        parent: ObjectID,
        entries: Mapping[str, _Entry],
        blobs: Iterable[Blob],
        fields: _Fields,
    ) -> ObjectID:
        """Write a commit on `parent` whose tree is the parent's with `entries` replaced."""
        new: list[ShaFile] = list(blobs)
        tree = self._tree_with(self._commit(parent).tree, entries, new)
        commit = Commit()
        commit.tree = tree
        commit.parents = [parent]
        commit.author, commit.author_time, commit.author_timezone = fields.author
        commit.committer, commit.commit_time, commit.commit_timezone = fields.committer
        commit.message = fields.message
        new.append(commit)  # last: a commit is never stored before what it names
        store = self._repo.object_store
        try:
            for obj in new:
                if obj.id not in store:
                    store.add_object(obj)
        except OSError as exc:
            raise GitError(
                f"writing the commit into {self.path} failed: {exc}", retryable=True
            ) from exc
        return commit.id

    def _tree_with(
        self, tree_id: ObjectID | None, entries: Mapping[str, _Entry], new: list[ShaFile]
    ) -> ObjectID:
        tree = Tree() if tree_id is None else cast(Tree, self._tree(tree_id).copy())
        below: dict[bytes, dict[str, _Entry]] = {}
        for rel, entry in entries.items():
            first, _, rest = rel.partition("/")
            if rest:
                below.setdefault(first.encode(), {})[rest] = entry
            else:
                tree[first.encode()] = entry
        for name, sub in below.items():
            current = _entry(tree, name)
            if current is not None and not stat.S_ISDIR(current[0]):
                raise GitError(f"{name.decode()} is not a directory", retryable=False)
            tree[name] = (stat.S_IFDIR, self._tree_with(current and current[1], sub, new))
        new.append(tree)
        return tree.id


@contextlib.asynccontextmanager
async def cloned(
    repo_url: str,
    branch: str,
    *,
    work_dir: str | Path | None = None,
    auth: GitAuth | None = None,
    read: Sequence[str] | None = None,
) -> AsyncIterator[BranchClone]:
    """A fresh bare clone of the tip of `branch`, removed when the block exits (even on
    cancel): one git process. `auth`: credentials for the remote (also used by `push`).
    `read`: the only files whose content `read_file` will be asked for; the clone then
    holds no other file's content (a partial clone), and reading another fails."""
    _check_ref(branch)
    parent = Path(work_dir) if work_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="turbodeploy-", dir=parent))
    clone: BranchClone | None = None
    try:
        dest = scratch / "repo.git"
        await _git(
            [
                "clone", "--quiet", "--template=", "--bare", "--depth=1", "--single-branch",
                "--no-tags", f"--branch={branch}",
                *(["--filter=blob:none"] if read is not None else []),
                "--", repo_url, str(dest),
            ],
            action=f"cloning branch {branch!r} of {_redact(repo_url)}",
            remote=(repo_url, auth),
        )  # fmt: skip
        clone = BranchClone(dest, repo_url, branch, auth)
        if read:
            await _fetch_blobs(clone, read)
        yield clone
    finally:
        if clone is not None:
            clone._close()
        # Off the event loop: with many deploys at once, unlinking even a handful of files
        # each took a measurable share of the loop (BENCHMARKS.md). Shielded: also on cancel.
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True))


async def _fetch_blobs(clone: BranchClone, paths: Sequence[str]) -> None:
    """Fetch the content of `paths` at the cloned commit that a partial clone left out: one
    request for them all, as git's own lazy fetch makes it."""
    store = clone._repo.object_store
    wanted = []
    for path in paths:
        entry = clone._lookup(_relpath(path))
        if entry is None or not stat.S_ISREG(entry[0]):
            continue
        if entry[1] not in store and entry[1] not in _blobs:
            wanted.append(entry[1].decode("ascii"))
    if not wanted:
        return
    await _git(
        [
            "-c", "fetch.negotiationAlgorithm=noop", "fetch", "--quiet", "--no-tags",
            "--no-write-fetch-head", "--recurse-submodules=no", "--filter=blob:none",
            "--", "origin", *wanted,
        ],
        cwd=clone.path,
        action=f"fetching {', '.join(paths)} of branch {clone.branch!r}",
        remote=(clone.repo_url, clone._auth),
    )  # fmt: skip


def read_file(clone: BranchClone, relpath: str) -> str | None:
    """The text of a file of the clone (as written, when it was), or None when it does not
    exist. Line ends read as from a file opened in text mode: CRLF and CR become LF."""
    rel = _relpath(relpath)
    data = clone._staged.get(rel)
    if data is None:
        entry = clone._lookup(rel)
        if entry is None:
            return None
        if not stat.S_ISREG(entry[0]):
            raise GitError(f"{relpath} is not a regular file", retryable=False)
        data = clone._blob(entry[1])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise GitError(f"{relpath} is not UTF-8 text", retryable=False) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def has_file(clone: BranchClone, relpath: str) -> bool:
    """Whether the clone holds anything (a file, a directory, a link) at `relpath`."""
    rel = _relpath(relpath)
    if rel in clone._staged or any(p.startswith(f"{rel}/") for p in clone._staged):
        return True
    return clone._lookup(rel) is not None


def write_file(clone: BranchClone, relpath: str, content: str) -> None:
    """Set the content of a file (kept in memory until `commit_if_changed`)."""
    rel = _relpath(relpath)
    entry = clone._lookup(rel)
    if entry is not None and not stat.S_ISREG(entry[0]):
        raise GitError(f"{relpath} is not a regular file", retryable=False)
    clone._staged[rel] = content.encode("utf-8")


async def commit_if_changed(
    clone: BranchClone, paths: Sequence[str], *, message: str, author: GitIdentity
) -> bool:
    """Commit the written `paths` when their content differs from the cloned commit; True
    when a commit was made. One commit per clone."""
    if clone._pending is not None:
        raise GitError("this clone already holds a commit to push", retryable=False)
    base = ObjectID(clone.base_sha.encode())
    blobs: list[Blob] = []
    before: dict[str, _Entry | None] = {}
    after: dict[str, _Entry] = {}
    for rel in dict.fromkeys(_relpath(p) for p in paths):
        if rel not in clone._staged:
            continue  # not written: unchanged
        blob = Blob.from_string(clone._staged[rel])
        _blobs.put(blob)
        old = clone._lookup(rel)
        # As `git add` would stage it: the executable bit of the file it replaces is kept.
        entry = (_EXECUTABLE if old is not None and old[0] & 0o100 else _REGULAR, blob.id)
        if entry != old:
            blobs.append(blob)
            before[rel], after[rel] = old, entry
    if not after:
        return False
    now = int(time.time())
    signature = (_ident(author), now, _utc_offset(now))
    fields = _Fields(message=_clean_message(message), author=signature, committer=signature)
    sha = clone._build(base, after, blobs, fields)
    clone._pending = _Pending(sha=sha, before=before, after=after, fields=fields)
    return True


async def push(
    clone: BranchClone, *, author: GitIdentity, attempts: int = PUSH_ATTEMPTS
) -> PushOutcome:
    """Push the clone's commit to its branch.

    When the branch moved meanwhile, fetch its tip, make our commit again on it (in
    process) and try again, at most `attempts` times. If the branch changed a file we
    committed (someone edited the same file), stop: a retry must start from the new
    content rather than push a mix. If it already holds exactly our content, there is
    nothing left to push. `author` commits the replayed change (as its committer).
    """
    pending = clone._pending
    if pending is None:
        return PushOutcome(sha=clone.base_sha, pushed=False, rebased=False)
    ref = f"refs/heads/{clone.branch}"
    tracking = f"refs/remotes/origin/{clone.branch}"
    remote = (clone.repo_url, clone._auth)
    rebased = False
    for attempt in range(1, attempts + 1):
        sha = pending.sha.decode()
        result = await _run(
            ["push", "--porcelain", "--no-verify", "--", "origin", f"{sha}:{ref}"],
            cwd=clone.path,
            action="pushing",
            remote=remote,
        )
        if result.returncode == 0:
            return PushOutcome(sha=sha, pushed=True, rebased=rebased)
        output = result.stdout + result.stderr
        if not _is_non_fast_forward(output):
            raise _classify(
                f"pushing to branch {clone.branch!r}", result.stderr or output, clone._auth
            )
        if attempt == attempts:
            raise GitError(
                f"pushing to branch {clone.branch!r} failed: the branch kept moving "
                f"during {attempts} attempts; {_trim(output, clone._auth)}",
                retryable=True,
            )
        await _git(
            ["fetch", "--quiet", "--depth=1", "--no-tags", "--", "origin", f"+{ref}:{tracking}"],
            cwd=clone.path,
            action=f"fetching branch {clone.branch!r}",
            remote=remote,
        )
        tip = clone._ref(Ref(tracking.encode()))
        rebased = True
        replayed = _replay(clone, pending, tip, author)
        if replayed is None:
            # The branch already holds exactly our change: nothing left to push.
            return PushOutcome(sha=tip.decode(), pushed=False, rebased=True)
        pending = clone._pending = replayed
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------------------ helpers

_REGULAR: Final = 0o100644
_EXECUTABLE: Final = 0o100755
_Entry = tuple[int, ObjectID]  # a tree entry: mode and object id
_Signature = tuple[bytes, int, int]  # `Name <email>`, seconds since the epoch, UTC offset


@dataclass(frozen=True)
class _Fields:
    message: bytes
    author: _Signature
    committer: _Signature


@dataclass(frozen=True)
class _Pending:
    """A commit of ours that the branch does not have yet."""

    sha: ObjectID
    before: dict[str, _Entry | None]  # the changed paths in the commit it was made on
    after: dict[str, _Entry]  # and in ours
    fields: _Fields


def _entry(tree: Tree, name: bytes) -> _Entry | None:
    try:
        return tree[name]
    except KeyError:
        return None


def _replay(
    clone: BranchClone, pending: _Pending, tip: ObjectID, author: GitIdentity
) -> _Pending | None:
    """Our change made again on `tip`, or None when `tip` already holds it."""
    tip_tree = clone._commit(tip).tree
    theirs = {rel: clone._lookup(rel, tip_tree) for rel in pending.after}
    todo = {rel: ours for rel, ours in pending.after.items() if theirs[rel] != ours}
    if not todo:
        return None
    if edited := sorted(rel for rel in todo if theirs[rel] != pending.before[rel]):
        raise GitError(
            f"branch {clone.branch!r} changed {', '.join(edited)} while we were committing; "
            "the change must be made again on the new content",
            retryable=True,
        )
    now = int(time.time())
    fields = _Fields(
        message=pending.fields.message,
        author=pending.fields.author,  # as `git rebase` does: the author and date stay
        committer=(_ident(author), now, _utc_offset(now)),
    )
    sha = clone._build(tip, todo, (), fields)  # the blobs are stored already
    return _Pending(sha=sha, before=theirs, after=pending.after, fields=fields)


def _open(path: Path) -> Repo:
    with _reading(path):
        repo = Repo(str(path))
    fmt = repo.object_store.object_format.name
    if fmt != "sha1":
        # Committing writes object ids: only the format this module hashes with is handled.
        repo.close()
        raise GitError(
            f"the repository uses {fmt.upper()} object ids; only SHA-1 repositories are supported",
            retryable=False,
        )
    return repo


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Failures to read the clone's objects, as retryable errors (a new clone may do)."""
    try:
        yield
    except (
        KeyError,
        OSError,
        ChecksumMismatch,
        FileFormatException,
        WrongObjectException,
        NotGitRepository,
    ) as exc:
        raise GitError(f"reading the clone at {path} failed: {exc!r}", retryable=True) from exc


# What git strips from both ends of an identity's name and email (ident.c's `crud`).
_CRUD: Final = "".join(chr(c) for c in range(33)) + ",:;<>\"\\'"
_DELIMITERS: Final = str.maketrans("", "", "\n<>")


def _ident(who: GitIdentity) -> bytes:
    """`Name <email>` cleaned up exactly as git cleans an identity it reads from its
    environment."""
    name = who.name.strip(_CRUD).translate(_DELIMITERS)
    email = who.email.strip(_CRUD).translate(_DELIMITERS)
    if not name:
        raise GitError(f"empty ident name (for <{email}>) not allowed", retryable=False)
    return f"{name} <{email}>".encode()


def _utc_offset(when: int) -> int:
    """The local time zone's offset at `when`, in seconds (git records the local zone)."""
    return time.localtime(when).tm_gmtoff


def _clean_message(message: str) -> bytes:
    """The message as `git commit --message` stores it: trailing whitespace removed from
    each line, runs of blank lines made one, none at either end, a final newline."""
    lines: list[str] = []
    blank = False
    for line in message.split("\n"):
        line = line.rstrip(" \t\r\v\f")
        if not line:
            blank = bool(lines)
            continue
        if blank:
            lines.append("")
            blank = False
        lines.append(line)
    if not lines:
        raise GitError("the commit message is empty", retryable=False)
    return "".join(f"{line}\n" for line in lines).encode()


def _relpath(relpath: str) -> str:
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.parts[0] == ".git":
        raise GitError(f"{relpath!r} is not a path inside the repository", retryable=False)
    return rel.as_posix()


# ------------------------------------------------------------------ a checkout of a commit


@contextlib.asynccontextmanager
async def cloned_commit(
    repo_url: str,
    sha: str,
    *,
    work_dir: str | Path | None = None,
    auth: GitAuth | None = None,
) -> AsyncIterator[Checkout]:
    """A fresh checkout of exactly commit `sha`, removed when the block exits."""
    parent = Path(work_dir) if work_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="turbodeploy-", dir=parent))
    try:
        yield await fetch_commit(repo_url, sha, scratch / "repo", auth=auth)
    finally:
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True))


async def fetch_commit(
    repo_url: str, sha: str, dest: Path, *, auth: GitAuth | None = None
) -> Checkout:
    """Check out commit `sha` of `repo_url` into `dest` (which must not exist yet).

    Only that commit is fetched (depth 1), which git's protocol v2 allows for any commit
    reachable from a branch. A server that only serves branch tips gets a full fetch of its
    branches instead, so a commit that is no longer the tip is still found.
    """
    _check_sha(sha)
    where = _redact(repo_url)
    remote = (repo_url, auth)
    await _git(["init", "--quiet", "--", str(dest)], action="preparing a checkout")
    await _git(["remote", "add", "--", "origin", repo_url], cwd=dest, action="preparing a checkout")
    shallow = await _run(
        ["-c", "protocol.version=2", "fetch", "--quiet", "--depth=1", "--no-tags", "--",
         "origin", sha],
        cwd=dest,
        action="fetching",
        remote=remote,
    )  # fmt: skip
    if shallow.returncode != 0:
        if not _UNADVERTISED_RE.search(shallow.stderr):
            raise _classify(f"fetching commit {sha} of {where}", shallow.stderr, auth)
        await _git(
            ["fetch", "--quiet", "--no-tags", "--", "origin",
             "+refs/heads/*:refs/remotes/origin/*"],
            cwd=dest,
            action=f"fetching the branches of {where}",
            remote=remote,
        )  # fmt: skip
        present = await _run(
            ["cat-file", "-e", f"{sha}^{{commit}}"], cwd=dest, action="looking up the commit"
        )
        if present.returncode != 0:
            raise GitError(
                f"commit {sha} is not on any branch of {where} (was the branch force-pushed?)",
                retryable=False,
            )
    await _git(
        ["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", sha],
        cwd=dest,
        action=f"checking out commit {sha}",
    )
    return Checkout(path=dest, repo_url=repo_url, base_sha=await _head_sha(dest))


async def _head_sha(repo: Path) -> str:
    out = await _git(["rev-parse", "--verify", "HEAD"], cwd=repo, action="reading HEAD")
    return out.strip()


def _is_non_fast_forward(output: str) -> bool:
    return bool(
        re.search(r"\[rejected\].*\((fetch first|non-fast-forward)\)|non-fast-forward", output)
    )


_SHA_RE: Final = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
# What a server that does not serve arbitrary commits answers to a fetch of one; a commit
# it does not have at all reads the same over protocol v2.
_UNADVERTISED_RE: Final = re.compile(
    r"not our ref|unadvertised object|couldn't find remote ref", re.I
)


def _check_sha(sha: str) -> None:
    if not _SHA_RE.fullmatch(sha):
        raise GitError(f"{sha!r} is not a full commit id", retryable=False)


def _check_ref(branch: str) -> None:
    if not branch or branch.startswith("-") or any(c.isspace() for c in branch):
        raise GitError(f"{branch!r} is not a valid branch name", retryable=False)
