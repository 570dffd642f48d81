from nsbuild.cli.cli import main

main()
