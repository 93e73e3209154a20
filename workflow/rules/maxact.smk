# Stage 'maxact': rules are added by its issue.
