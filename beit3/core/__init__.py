"""Layer 0, the base every other layer uses: errors and how commands report them, files written
atomically and outputs checked before work, settings (flags generated from dataclasses, value
ranges), and checkpoint files read without running code (docs/architecture.md)."""
