"""Terminal output shared by both nodes: quiet libraries so our own progress lines stay readable."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Silence library progress bars and deprecation chatter so our own progress lines stay readable."""
    import logging  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
    logging.getLogger("tasks").setLevel(logging.INFO)
