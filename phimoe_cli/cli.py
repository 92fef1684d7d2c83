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


@app.command()
def tokenize(
    text: str = typer.Argument(None, help="The text to encode (default: read stdin).", show_default=False),
    model: str = typer.Option(
        "microsoft/Phi-3.5-MoE-instruct", "--model", "-m", help="Checkpoint directory or (downloaded) hub repo id."
    ),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit of a hub repo."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Each stdin line is a JSON string (or array with --decode)."),
    chat: bool = typer.Option(False, "--chat", help="Encode TEXT as one user message in the chat format."),
    decode: bool = typer.Option(False, "--decode", help="Turn a JSON array of ids back into text."),
) -> None:
    """Print the token ids of TEXT (or stdin) as a JSON array: plain text, no chat template."""
    from phimoe_cli.tokenize_command import main as run_tokenize

    code = run_tokenize(text, model, revision=revision, jsonl=jsonl, chat=chat, decode=decode)
    if code:
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
