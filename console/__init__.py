"""What both nodes' command lines share: one-line errors, quiet libraries, common options."""
