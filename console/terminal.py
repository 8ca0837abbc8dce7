"""Terminal output shared by both nodes: quiet libraries so our own progress lines stay readable."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Silence library progress bars and deprecation chatter so our own progress lines stay readable."""
    import logging  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns on import about an extra
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    logging.getLogger("tasks").setLevel(logging.INFO)


def run_cli(run, argv: list[str] | None, interrupted: str = "interrupted") -> int:
    """Run a CLI body: a FedbiotError becomes one `error: ...` line and exit status 2."""
    import sys  # noqa: PLC0415

    from errors import FedbiotError  # noqa: PLC0415

    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except FedbiotError as exc:
        text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"error: {text or type(exc).__name__}", file=sys.stderr)  # one line, even for a library's text
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
