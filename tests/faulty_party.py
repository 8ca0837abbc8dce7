"""A party process with a fault injected through `PartyNode(after_stage=...)`, for the network tests. Takes the
`party` command's flags; the fault is chosen by the environment:

- `FEDBIOT_TEST_FAULT=quit` (the default): it vanishes right after sending its key shares in its first secure
  round.
- `FEDBIOT_TEST_FAULT=pause`: right after its first masked input has left it logs `PAUSED` and stops (no
  heartbeats, no reads) until the file named by `FEDBIOT_TEST_RESUME` exists, then goes on as a normal
  party: the test kills the owner in that window, after the parties masked a round the owner never closed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from console.terminal import quiet_libraries
from party.cli import build_parser, options_from_args
from party.session import PartyNode

EXIT_STATUS = 3
MESSAGE = "test fault: exiting right after sending the key shares"
PAUSED = "test fault: paused right after sending the masked input"


def main() -> None:
    node: PartyNode | None = None
    fault = os.environ.get("FEDBIOT_TEST_FAULT", "quit")
    paused = False

    def after_stage(stage: str) -> None:
        nonlocal paused
        if fault == "quit" and stage == "share_keys":
            node.log(MESSAGE)
            node.close(linger_ms=5000)
            os._exit(EXIT_STATUS)
        if fault == "pause" and stage == "masked_input" and not paused:
            paused = True
            node.log(PAUSED)
            resume = Path(os.environ["FEDBIOT_TEST_RESUME"])
            while not resume.exists():
                time.sleep(0.05)

    quiet_libraries()
    node = PartyNode(options_from_args(build_parser().parse_args(sys.argv[1:])), after_stage=after_stage)
    sys.exit(node.run())


if __name__ == "__main__":
    main()
