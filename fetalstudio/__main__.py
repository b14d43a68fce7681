import sys

from fetalstudio.cli import main

sys.exit(main())
