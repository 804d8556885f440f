import sys

from tfhybrid.cli.main import main

sys.exit(main())
