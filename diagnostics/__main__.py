from diagnostics.cli import app

app(prog_name="diagnostics")
