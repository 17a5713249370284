class RouterArgs:
    """Stub: slime adds the router's flags only when it parses SGLang's, which --debug-train-only
    skips."""

    @staticmethod
    def add_cli_args(parser, *args, **kwargs):
        return parser


def launch_router(*args, **kwargs):
    raise RuntimeError("sglang_router stub: no router in the CPU test")
