from bench.decode.main import main

raise SystemExit(main())
