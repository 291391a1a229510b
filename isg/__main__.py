import sys

from isg.cli import main

sys.exit(main())
