"""The Ray Train entrypoint: `python -m train_job --config job.json`.

The only package besides serve_app that imports Ray. It runs kd's plain-torch loop on
N workers with TorchTrainer, reports metrics, checkpoints to shared storage, resumes
after failures, and tells the job registry how the job is doing.
"""
