"""`python -m first_lib.bench --memory-worker SPEC`: the process `measure_memory` starts."""

import sys

from first_lib.bench.memory import _worker_main

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit("usage: first bench ...  (this module's __main__ is the memory worker)")
