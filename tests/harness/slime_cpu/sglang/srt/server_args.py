import dataclasses


@dataclasses.dataclass
class ServerArgs:
    """Stub: SGLang's server settings. slime's parser adds their flags only when it parses
    SGLang's (skipped with --debug-train-only); its rollout module imports the class at load."""

    @staticmethod
    def add_cli_args(parser):
        return parser
