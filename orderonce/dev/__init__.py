"""Development and demonstration only: embedded servers, the demo, the chaos harness and the
processes they start. Production code never imports this package; the CLI does, for
``orderonce demo``, ``chaos`` and for the embedded default when no URLs are configured."""
