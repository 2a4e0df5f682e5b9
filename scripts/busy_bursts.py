"""A CPU-bound process that works and sleeps in random bursts (1-6 s each): run one or two beside a timing to
see how a figure's protocol stands up to another job on the machine (docs/design.md, "How the step figures are
timed"). A development tool.

    .venv/bin/python scripts/busy_bursts.py & .venv/bin/python scripts/busy_bursts.py 2 & ...; kill %1 %2
"""

import random
import sys
import time

random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
while True:
    end = time.time() + random.uniform(1, 6)
    while time.time() < end:
        pass
    time.sleep(random.uniform(1, 6))
