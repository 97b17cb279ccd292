"""The app every test configures unless it says otherwise."""

TEST_APP_ID = "5f3e1a2b3c4d5"
TEST_SECRET = "s3cr3t-app-secret"
