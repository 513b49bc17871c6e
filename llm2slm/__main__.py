from llm2slm.cli import main

raise SystemExit(main())
