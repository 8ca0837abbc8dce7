"""A party process that vanishes right after sending its key shares in its first secure round: the network
tests' fault, injected through `PartyNode(after_stage=...)`. Takes the `party` command's flags."""

from __future__ import annotations

import os
import sys

from console.terminal import quiet_libraries
from party.cli import build_parser, options_from_args
from party.client import PartyNode

EXIT_STATUS = 3
MESSAGE = "test fault: exiting right after sending the key shares"


def main() -> None:
    node: PartyNode | None = None

    def after_stage(stage: str) -> None:
        if stage == "share_keys":
            node.log(MESSAGE)
            node.close(linger_ms=5000)
            os._exit(EXIT_STATUS)

    quiet_libraries()
    node = PartyNode(options_from_args(build_parser().parse_args(sys.argv[1:])), after_stage=after_stage)
    sys.exit(node.run())


if __name__ == "__main__":
    main()
