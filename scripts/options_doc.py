"""Writes docs/options.md, the options reference, from the option tables (console/options.py, owner/options.py,
party/options.py): `python scripts/options_doc.py`. tests/test_options.py checks that the committed file is
what this writes, so a changed option fails the tests until the reference is written again."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "options.md"

HEADER = """# Options

Every option of `owner` and `party`, generated from their declarations (`owner/options.py`,
`party/options.py`, and `console/options.py` for those both nodes take) by `python scripts/options_doc.py`;
`owner --help` and `party --help` print the same text.

**Config files.** `owner --config run.toml` and `party --config party.toml` take any of these options by
its long name, with dashes or underscores (`local-steps = 8`, `local_steps = 8`; a switch takes `true` or
`false`, `target-modules` a list); flags on the command line override the file. **sets** names the field an
option sets: `RunConfig` is what a run saves as `OUT/config.json` (the sections `lora`, `train`, `align`
and `dp` are nested there), and that file can be given back (`owner --config RUN/config.json --simulate
--out AGAIN`); `ServeOptions` is the networked owner's, `PartyOptions` the party's.

"""


def render() -> str:
    from console.options import references  # noqa: PLC0415
    from owner import options as owner  # noqa: PLC0415
    from party import options as party  # noqa: PLC0415

    return HEADER + references(owner.COMMANDS) + "\n" + references(party.COMMANDS)


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}")
