"""CLI verbs. Each module here has ``register(subparsers)`` adding its parser with
``set_defaults(func=handler)``; a handler takes the parsed namespace and returns an exit code.

Add a verb by adding its module name to ``MODULES`` (one per line, keep sorted).
"""

MODULES: tuple[str, ...] = (
    "boot_test",
    "build",
    "eventlog",
    "fetch",
    "identify",
    "inspect",
    "keys",
    "lock",
    "platform",
    "predict",
    "publish",
    "repro",
    "sign",
    "verify",
    "verify_pe",
)
