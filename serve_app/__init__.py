"""The HTTP service: Ray Serve + FastAPI in front of Ray Jobs and a job registry actor.

Import path for `serve run` and Serve config files: `serve_app.app:app` (the bound
application with settings from the environment) or `serve_app.app:app_builder`.
"""
