import sys

from visae.zeroshot import main

if __name__ == "__main__":
    sys.exit(main())
