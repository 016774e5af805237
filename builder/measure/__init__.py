"""Measured boot: TCG event logs, platform references, chain profiles, prediction, verdicts."""
