from simvirt.cli import main

raise SystemExit(main())
