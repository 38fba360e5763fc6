import sys

from klas_runtime.cli import main

sys.exit(main())
