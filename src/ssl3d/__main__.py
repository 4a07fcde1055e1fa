from ssl3d.cli import run

run()
