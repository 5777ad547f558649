from service.loadtest.cli import main

raise SystemExit(main())
