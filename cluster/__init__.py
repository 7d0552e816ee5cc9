"""Commands that run TerraHash jobs: the `terrahash` CLI and setup scripts."""
