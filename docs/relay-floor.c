// The relay floor quoted in docs/BENCHMARKS.md: what a process that relays each call
// (caller -> daemon -> worker) costs over a direct echo, with nothing else done.
//
//   cc -O2 -DN=1 -pthread docs/relay-floor.c -o /tmp/relay-floor
//   taskset -c 0 /tmp/relay-floor          # direct echo
//   taskset -c 0 /tmp/relay-floor relay    # relay + backend
//
// N client threads (64 by default; N=1 for one call at a time), each on its own Unix
// connection, send 24-byte requests and wait for the 24-byte answer, for 2 s, to
// (a) an epoll echo server process, or (b) a relay process that forwards them to a
// backend echo process over one socket and routes the answers back. Prints calls/s
// (1e6 / that = microseconds a call with N=1).
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <signal.h>
#include <time.h>
#include <stdatomic.h>
#ifndef N
#define N 64
#endif
static int cfd[N]; static atomic_long done; static volatile int stop;
static void *client(void *a){ int fd=*(int*)a; char b[24]={0}; while(!stop){ if(write(fd,b,24)!=24)break; int g=0; while(g<24){int r=read(fd,b+g,24-g); if(r<=0)return 0; g+=r;} atomic_fetch_add(&done,1);} return 0;}
static double now(){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec+t.tv_nsec/1e9;}
int main(int argc,char**argv){ int relay=argc>1; int sfd[N];
 for(int i=0;i<N;i++){int p[2]; socketpair(AF_UNIX,SOCK_STREAM,0,p); cfd[i]=p[0]; sfd[i]=p[1];}
 int bp[2]; socketpair(AF_UNIX,SOCK_STREAM,0,bp);
 pid_t kids[2]={0,0};
 if(relay && (kids[0]=fork())==0){ // backend echo: reads batches, writes back batches
   char buf[65536]; for(;;){int r=read(bp[1],buf,sizeof buf); if(r<=0)_exit(0); write(bp[1],buf,r);} }
 if((kids[1]=fork())==0){ int ep=epoll_create1(0); for(int i=0;i<N;i++){struct epoll_event e={.events=EPOLLIN,.data.u32=i}; epoll_ctl(ep,EPOLL_CTL_ADD,sfd[i],&e);}
   if(relay){struct epoll_event e={.events=EPOLLIN,.data.u32=999}; epoll_ctl(ep,EPOLL_CTL_ADD,bp[0],&e);}
   int fifo[1<<16]; unsigned h=0,t=0; char buf[65536]; struct epoll_event ev[64];
   for(;;){int n=epoll_wait(ep,ev,64,-1); for(int k=0;k<n;k++){unsigned i=ev[k].data.u32;
     if(i==999){int r=read(bp[0],buf,sizeof buf); for(int j=0;j<r/24;j++){int c=fifo[h++&0xffff]; write(sfd[c],buf+24*j,24);} }
     else {char b[24]; int r=read(sfd[i],b,24); if(r<=0)_exit(0); if(relay){fifo[t++&0xffff]=i; write(bp[0],b,24);} else write(sfd[i],b,24);} }}}
 pthread_t th[N]; for(int i=0;i<N;i++)pthread_create(&th[i],0,client,&cfd[i]);
 double t0=now(); sleep(2); stop=1; long d=done; printf("%s: %.0f calls/s\n", relay?"relay+backend":"echo", d/(now()-t0)); fflush(stdout);
 // The servers hold copies of every socket, so they never see an end of file: ended here.
 for(int i=0;i<2;i++) if(kids[i]>0){ kill(kids[i],SIGKILL); waitpid(kids[i],0,0); }
 _exit(0);}
