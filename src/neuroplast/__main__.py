from neuroplast.cli import main

raise SystemExit(main())
