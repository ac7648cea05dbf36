import sys

from flysim.cli import main

sys.exit(main())
