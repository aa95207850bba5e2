from orderonce.cli import app

app()
