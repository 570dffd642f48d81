"""The customisation layer's tree on the host: store links, copyToRoot merge, Nix DB, runAsRoot/fakeRootCommands."""
