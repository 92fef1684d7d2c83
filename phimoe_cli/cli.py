"""The `phimoe` command line: one thin function per command."""

from __future__ import annotations

import typer

from phimoe_cli import __version__

app = typer.Typer(
    name="phimoe",
    help="Chat with Microsoft's Phi-3.5-MoE-instruct on your own hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"phimoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Chat with Microsoft's Phi-3.5-MoE-instruct on your own hardware."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
