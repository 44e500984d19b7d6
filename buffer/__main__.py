import sys

from buffer.cli import main

sys.exit(main())
