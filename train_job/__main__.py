from train_job.cli import main

raise SystemExit(main())
