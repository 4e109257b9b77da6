import sys

from marco.llm.kernels import main

sys.exit(main())
