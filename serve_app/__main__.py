from serve_app.local import main

raise SystemExit(main())
