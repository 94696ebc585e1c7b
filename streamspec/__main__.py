from streamspec.tools.cli import main

raise SystemExit(main())
