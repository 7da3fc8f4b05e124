import sys

from saelightning.cli import main

sys.exit(main())
