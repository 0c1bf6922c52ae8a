from fakecifar.cli.app import main

main()
