import sys

from sgpo.cli.main import main

sys.exit(main())
