import sys

from sasrec.cli import main

if __name__ == "__main__":  # multiprocessing's spawn re-imports this module in its children
    sys.exit(main())
