from klas.cli import main

raise SystemExit(main())
