"""Terminal output shared by both nodes: quiet libraries so our own progress lines stay readable, and
one `error:` line for whatever the user got wrong."""

from __future__ import annotations

import argparse

# Libraries that log what a user of fedbiot cannot act on: bitsandbytes warns about optional accelerations
# on import ("Failed to load CPU gemm_4bit_forward from kernels-community"); MLflow and alembic announce
# their database set-up (--report-to mlflow).
NOISY_LOGGERS = ("bitsandbytes", "mlflow", "alembic")


def quiet_import_noise(argv: list[str]) -> None:
    """Before the CLI imports its libraries (building its parser does): mute what they log on import,
    unless `--verbose` is on the command line."""
    import logging  # noqa: PLC0415

    if "--verbose" not in argv:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Silence library progress bars and deprecation chatter so our own lines are the only output.

    transformers' own bars ("Loading weights") follow its logging switch, but its GGUF loader draws a raw
    tqdm bar ("Converting and de-quantizing GGUF tensors"), which only a disabled tqdm in that module stops.
    Our own warnings (the `tasks` logger) still print.
    `--verbose` skips all of this.
    """
    import logging  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    from huggingface_hub.utils import logging as hub_logging  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU backend warns on import about an extra
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # its "Retrying in 1s [Retry 1/5]" lines: our error says what failed
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    logging.getLogger("tasks").setLevel(logging.INFO)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_gguf_bar()


def _quiet_gguf_bar() -> None:
    import functools  # noqa: PLC0415

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_loader  # noqa: PLC0415
    except ImportError:  # no GGUF support installed: no bar either
        return
    bar = getattr(gguf_loader, "tqdm", None)
    if bar is not None and not isinstance(bar, functools.partial):
        gguf_loader.tqdm = functools.partial(bar, disable=True)


class OneLineErrors(argparse.ArgumentParser):
    """An argument parser whose usage errors (an unknown option, a value outside its choices, a missing
    required one) are ConfigErrors, so the CLI prints them as one `error:` line and exits 2."""

    def error(self, message: str):
        import difflib  # noqa: PLC0415

        from errors import ConfigError  # noqa: PLC0415

        if message.startswith("unrecognized arguments: "):  # a mistyped flag: name the one meant
            flags = [f for action in self._actions for f in action.option_strings if f.startswith("--")]
            for word in message.removeprefix("unrecognized arguments: ").split():
                close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.7)
                if word.startswith("--") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        raise ConfigError(message)


def run_cli(run, argv: list[str] | None, interrupted: str = "interrupted") -> int:
    """Run a CLI body: a FedbiotError becomes one `error: ...` line and exit status 2; output piped into a
    command that stops reading (`owner plan | head`) ends the CLI quietly (status 1), not in a traceback."""
    import os  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from errors import FedbiotError, one_line  # noqa: PLC0415

    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except BrokenPipeError:
        try:  # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout without a descriptor (captured in tests)
            pass
        return 1
    except FedbiotError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
