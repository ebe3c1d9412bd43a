// A real PostgreSQL for one test: see bench/pg-server.ts (the benchmarks start one the same way).
export { type PgServer, pgBinDir, startPostgres, startPostgresTls, startStandby } from '../../bench/pg-server.js';
