"""Store the offline Fly token and org in the AWS SSM emulator, where the workers read them.

Run by the `ssm-seed` service of docker-compose.yml's `offline` profile. Parameter names,
region and endpoint come from the same settings as the worker's (TURBODEPLOY_*), the token
from FLY_API_TOKEN and the org from FLY_ORG_SLUG: never from the command line.
"""

from __future__ import annotations

import os
import sys

from core.settings import Settings
from turbodeploy.embedded import seed_ssm


def main() -> int:
    settings = Settings()
    token = os.environ.get("FLY_API_TOKEN", "")
    if not token:
        print(
            "FLY_API_TOKEN is empty: set OFFLINE_FLY_TOKEN (see deploy/offline.env)",
            file=sys.stderr,
        )
        return 2
    if not settings.aws_endpoint_url:
        # Without an endpoint boto3 would write the token to the real AWS account.
        print("TURBODEPLOY_AWS_ENDPOINT_URL must point at the emulator", file=sys.stderr)
        return 2
    seed_ssm(
        settings.aws_endpoint_url,
        token=token,
        org_slug=os.environ.get("FLY_ORG_SLUG") or settings.fly_default_org,
        token_parameter=settings.fly_token_parameter,
        org_parameter=settings.fly_org_parameter,
        region=settings.aws_region,
    )
    print(f"stored the Fly token at {settings.fly_token_parameter} in {settings.aws_endpoint_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
