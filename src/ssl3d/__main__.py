import sys

from ssl3d.cli import main

sys.exit(main())
