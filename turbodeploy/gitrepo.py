"""Git operations on a shallow checkout of one branch, without blocking the event loop.

Every command runs as `git` directly (never through a shell) with user-supplied refs and
paths after `--` or in `--opt=value` form, without terminal prompts, in the C locale so
errors can be classified, and is killed when the calling task is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

DEFAULT_TIMEOUT: Final = 300.0
PUSH_ATTEMPTS: Final = 3
_STDERR_LIMIT: Final = 1500


class GitError(Exception):
    """A git operation failed. `retryable` tells whether trying again later may succeed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class GitIdentity:
    name: str
    email: str


@dataclass(frozen=True)
class Checkout:
    """A working tree of `branch` of `repo_url`, cloned with depth 1, or of one commit
    (then `branch` is empty: nothing can be pushed from it)."""

    path: Path
    repo_url: str
    branch: str
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
        "access denied",
    ),
    (
        re.compile(r"hook declined|protected branch|\[remote rejected\](?!.*failed to)", re.I),
        "the remote refused the push",
    ),
)
_URL_CREDENTIALS_RE: Final = re.compile(r"(?<=://)[^/@\s]+@")


def _redact(text: str) -> str:
    return _URL_CREDENTIALS_RE.sub("***@", text)


def _trim(stderr: str) -> str:
    text = _redact(stderr.strip())
    if len(text) > _STDERR_LIMIT:
        text = "…" + text[-_STDERR_LIMIT:]
    return text


def _classify(action: str, stderr: str) -> GitError:
    detail = _trim(stderr) or "(no output)"
    for pattern, reason in _PERMANENT:
        if pattern.search(stderr):
            return GitError(f"{action} failed, {reason}: {detail}", retryable=False)
    return GitError(f"{action} failed: {detail}", retryable=True)


def _git_env(identity: GitIdentity | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_ASKPASS="",
        SSH_ASKPASS="",
        LC_ALL="C",
        LANGUAGE="C",
        GIT_CONFIG_NOSYSTEM="1",
    )
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    if identity is not None:
        env.update(
            GIT_AUTHOR_NAME=identity.name,
            GIT_AUTHOR_EMAIL=identity.email,
            GIT_COMMITTER_NAME=identity.name,
            GIT_COMMITTER_EMAIL=identity.email,
        )
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
    identity: GitIdentity | None = None,
    limit_seconds: float = DEFAULT_TIMEOUT,
    action: str,
) -> _Result:
    spawn = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            "git",
            *_SAFE_CONFIG,
            *args,
            cwd=cwd,
            env=_git_env(identity),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group, so ssh and remote helpers die with it.
            start_new_session=True,
        )
    )
    try:
        # Shielded: cancelled half-way, asyncio would kill git but not its children.
        proc = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        await asyncio.shield(_kill_once_spawned(spawn))
        raise
    except FileNotFoundError:
        raise GitError("git is not installed on this worker", retryable=False) from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), limit_seconds)
    except TimeoutError:
        await _kill(proc)
        raise GitError(f"{action} timed out after {limit_seconds:.0f}s", retryable=True) from None
    except BaseException:
        await _kill(proc)
        raise
    assert proc.returncode is not None
    return _Result(
        proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )


async def _kill_once_spawned(spawn: asyncio.Future[asyncio.subprocess.Process]) -> None:
    try:
        proc = await spawn
    except Exception:
        return  # it never started
    await _kill(proc)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    # Shielded so a second cancellation cannot leave a zombie behind.
    await asyncio.shield(proc.wait())


async def _git(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    identity: GitIdentity | None = None,
    limit_seconds: float = DEFAULT_TIMEOUT,
    action: str,
) -> str:
    result = await _run(
        args, cwd=cwd, identity=identity, limit_seconds=limit_seconds, action=action
    )
    if result.returncode != 0:
        raise _classify(action, result.stderr or result.stdout)
    return result.stdout


# --------------------------------------------------------------------------- public API


@contextlib.asynccontextmanager
async def cloned(
    repo_url: str, branch: str, *, work_dir: str | Path | None = None
) -> AsyncIterator[Checkout]:
    """A fresh shallow checkout of `branch`, removed when the block exits (even on cancel)."""
    parent = Path(work_dir) if work_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="turbodeploy-", dir=parent))
    try:
        yield await clone_branch(repo_url, branch, scratch / "repo")
    finally:
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True))


@contextlib.asynccontextmanager
async def cloned_commit(
    repo_url: str, sha: str, *, work_dir: str | Path | None = None
) -> AsyncIterator[Checkout]:
    """A fresh checkout of exactly commit `sha`, removed when the block exits."""
    parent = Path(work_dir) if work_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="turbodeploy-", dir=parent))
    try:
        yield await fetch_commit(repo_url, sha, scratch / "repo")
    finally:
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True))


async def fetch_commit(repo_url: str, sha: str, dest: Path) -> Checkout:
    """Check out commit `sha` of `repo_url` into `dest` (which must not exist yet).

    Only that commit is fetched (depth 1), which git's protocol v2 allows for any commit
    reachable from a branch. A server that only serves branch tips gets a full fetch of its
    branches instead, so a commit that is no longer the tip is still found.
    """
    _check_sha(sha)
    where = _redact(repo_url)
    await _git(["init", "--quiet", "--", str(dest)], action="preparing a checkout")
    await _git(["remote", "add", "--", "origin", repo_url], cwd=dest, action="preparing a checkout")
    shallow = await _run(
        ["-c", "protocol.version=2", "fetch", "--quiet", "--depth=1", "--no-tags", "--",
         "origin", sha],
        cwd=dest,
        action="fetching",
    )  # fmt: skip
    if shallow.returncode != 0:
        if not _UNADVERTISED_RE.search(shallow.stderr):
            raise _classify(f"fetching commit {sha} of {where}", shallow.stderr)
        await _git(
            ["fetch", "--quiet", "--no-tags", "--", "origin",
             "+refs/heads/*:refs/remotes/origin/*"],
            cwd=dest,
            action=f"fetching the branches of {where}",
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
    return Checkout(path=dest, repo_url=repo_url, branch="", base_sha=await head_sha(dest))


async def clone_branch(repo_url: str, branch: str, dest: Path) -> Checkout:
    """Clone only the tip of `branch` into `dest` (which must not exist yet)."""
    _check_ref(branch)
    what = f"cloning branch {branch!r} of {_redact(repo_url)}"
    await _git(
        [
            "clone", "--quiet", "--depth=1", "--single-branch", "--no-tags",
            f"--branch={branch}", "--", repo_url, str(dest),
        ],
        action=what,
    )  # fmt: skip
    sha = await head_sha(dest)
    return Checkout(path=dest, repo_url=repo_url, branch=branch, base_sha=sha)


def read_file(checkout: Checkout, relpath: str) -> str | None:
    """The text of a file of the checkout, or None when it does not exist."""
    path = _inside(checkout, relpath)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise GitError(f"{relpath} is not UTF-8 text", retryable=False) from None


def has_file(checkout: Checkout, relpath: str) -> bool:
    """Whether the checkout holds anything (a file, a directory, a link) at `relpath`."""
    return os.path.lexists(_inside(checkout, relpath))


def write_file(checkout: Checkout, relpath: str, content: str) -> None:
    path = _inside(checkout, relpath)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8", newline="\n")


async def commit_if_changed(
    checkout: Checkout, paths: Sequence[str], *, message: str, author: GitIdentity
) -> bool:
    """Commit `paths` when their content differs from HEAD; True when a commit was made."""
    rels = [str(_inside(checkout, p).relative_to(checkout.path)) for p in paths]
    await _git(["add", "--", *rels], cwd=checkout.path, action="staging changes")
    diff = await _run(
        ["diff", "--cached", "--quiet", "--", *rels], cwd=checkout.path, action="comparing"
    )
    if diff.returncode == 0:
        return False
    if diff.returncode != 1:
        raise _classify("comparing with the last commit", diff.stderr)
    await _git(
        ["commit", "--quiet", "--no-verify", f"--message={message}", "--", *rels],
        cwd=checkout.path,
        identity=author,
        action="committing",
    )
    return True


async def push(
    checkout: Checkout, *, author: GitIdentity, attempts: int = PUSH_ATTEMPTS
) -> PushOutcome:
    """Push the checkout's new commits to its branch.

    When the branch moved meanwhile, fetch its tip, replay our commits on it and try again,
    at most `attempts` times. Our commits are exactly those after `base_sha`, so the replay
    needs no common history (the clone is shallow). If the replay changes the content of a
    file we committed (someone edited the same file), stop: a retry must start from the
    new content rather than push a mix.
    """
    if not checkout.branch:
        raise GitError("a checkout of a single commit cannot be pushed", retryable=False)
    cwd = checkout.path
    ref = f"refs/heads/{checkout.branch}"
    tracking = f"refs/remotes/origin/{checkout.branch}"
    base = checkout.base_sha
    ours = await head_sha(cwd)
    if ours == base:
        return PushOutcome(sha=base, pushed=False, rebased=False)
    changed = (
        await _git(["diff", "--name-only", base, ours, "--"], cwd=cwd, action="listing changes")
    ).split()
    rebased = False
    for attempt in range(1, attempts + 1):
        result = await _run(
            ["push", "--porcelain", "--no-verify", "--", "origin", f"HEAD:{ref}"],
            cwd=cwd,
            action="pushing",
        )
        if result.returncode == 0:
            return PushOutcome(sha=await head_sha(cwd), pushed=True, rebased=rebased)
        output = result.stdout + result.stderr
        if not _is_non_fast_forward(output):
            raise _classify(f"pushing to branch {checkout.branch!r}", result.stderr or output)
        if attempt == attempts:
            raise GitError(
                f"pushing to branch {checkout.branch!r} failed: the branch kept moving "
                f"during {attempts} attempts; {_trim(output)}",
                retryable=True,
            )
        await _git(
            ["fetch", "--quiet", "--depth=1", "--no-tags", "--", "origin", f"+{ref}:{tracking}"],
            cwd=cwd,
            action=f"fetching branch {checkout.branch!r}",
        )
        tip = (
            await _git(["rev-parse", "--verify", f"{tracking}^{{commit}}"], cwd=cwd,
                       action="reading the remote tip")
        ).strip()  # fmt: skip
        before = await head_sha(cwd)
        replay = await _run(
            ["rebase", "--quiet", "--no-autostash", f"--onto={tip}", base],
            cwd=cwd,
            identity=author,
            action="rebasing",
        )
        if replay.returncode != 0:
            await _run(["rebase", "--abort"], cwd=cwd, action="aborting the rebase")
            raise GitError(
                f"branch {checkout.branch!r} changed {', '.join(changed)} while we were "
                f"committing; {_trim(replay.stderr or replay.stdout)}",
                retryable=True,
            )
        rebased = True
        base = tip
        after = await head_sha(cwd)
        if after == tip:
            # The branch already holds exactly our change: nothing left to push.
            return PushOutcome(sha=tip, pushed=False, rebased=True)
        drift = await _run(
            ["diff", "--quiet", before, after, "--", *changed], cwd=cwd, action="comparing"
        )
        if drift.returncode != 0:
            raise GitError(
                f"branch {checkout.branch!r} changed {', '.join(changed)} while we were "
                "committing; the change must be made again on the new content",
                retryable=True,
            )
    raise AssertionError("unreachable")  # pragma: no cover


async def head_sha(repo: Checkout | Path) -> str:
    cwd = repo.path if isinstance(repo, Checkout) else repo
    out = await _git(["rev-parse", "--verify", "HEAD"], cwd=cwd, action="reading HEAD")
    return out.strip()


# ------------------------------------------------------------------------------ helpers


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


def _inside(checkout: Checkout, relpath: str) -> Path:
    rel = PurePosixPath(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or rel.parts[0] == ".git":
        raise GitError(f"{relpath!r} is not a path inside the repository", retryable=False)
    return checkout.path.joinpath(*rel.parts)
