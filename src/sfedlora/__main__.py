import sys

from sfedlora.cli import main

sys.exit(main())
