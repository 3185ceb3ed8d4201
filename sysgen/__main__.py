import sys

from sysgen.cli import main

sys.exit(main())
